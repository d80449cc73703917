"""The local stack: Redis, SeaweedFS (S3) and the Procfile's processes, for `make run/up` and the tests."""
