"""The in-machine agent: the main process of a job's Fly Machine, running the job on LocalRuntime.

`python -m sandbox.agent` serves the HTTP protocol of server.py; workers drive it with
client.AgentClient. protocol.py holds what both sides share (token check, the machine's env).
"""
