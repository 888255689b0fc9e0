"""KV transfer layer: one agent per instance moves finished KV pages from a
prefill instance straight into the pages a decode instance reserved.

- ``base``: the interface (agent, per-room sender/receiver, RoomState), configs
  and the backend registry (``create_transfer_agent``).
- ``rooms``: per-agent room bookkeeping and the agent/sender/receiver
  skeleton both backends build on (peers, early news, aborts, shutdown).
- ``nixl_backend`` (default, ``nixl``) and ``ucx_backend`` (``ucx``): the data path.
- ``descriptors``: page lists to merged per-region descriptors.
- ``control``: the PD control channel (typed messages over TCP).
- ``harness``: an agent in its own process, for tests and benchmarks.
"""
