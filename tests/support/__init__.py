"""What the test modules share, one concept per module.

- :mod:`.waiting`: :func:`~.waiting.wait_until`, the one polling loop.
- :mod:`.clock`: :class:`~.clock.FakeClock`, for product code that takes ``clock=``.
- :mod:`.ports`: free, busy and refusing TCP ports on 127.0.0.1; sockets the other side closes.
- :mod:`.health`: ``/health`` of a service: :func:`~.health.is_healthy`, :func:`~.health.wait_healthy`.
- :mod:`.processes`: :func:`~.processes.stop_process`; process trees from /proc.
- :mod:`.openai_errors`: :func:`~.openai_errors.assert_openai_error`.
- :mod:`.server_thread`: an ASGI app served by uvicorn in a thread.
- :mod:`.fake_worker`: a fake serving instance for router, bootstrap and launcher tests.
- :mod:`.router_stack`: a router and fake instances in threads (the ``stack`` fixture).
- :mod:`.bench_fake_server`: an OpenAI-compatible server that streams at known times.
- :mod:`.server_process`: a real ``pdserve serve`` subprocess; :func:`~.server_process.server_fixture`.
- :mod:`.router_process`: a real ``pdserve router`` subprocess.
- :mod:`.clusters`: the config of a whole local cluster on free ports.
- :mod:`.hf_oracle`: the transformers reference for greedy outputs and log-probabilities.
- :mod:`.payloads`: request bodies, prompts and SSE parsing.
- :mod:`.kv_pools`: a small CPU KV pool.
- :mod:`.planted_model`: dummy checkpoints with a planted previous-token head.

Test modules import from here, never from one another.
"""
