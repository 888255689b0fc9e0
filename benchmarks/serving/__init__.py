"""Building blocks of the serving-path CPU benchmarks (``serving_cost``, ``front_alone``, ``served_vs_engine``).

``procs`` starts and stops the processes under test, ``cpu`` reads what they
spent from ``/proc``, ``bench_runs`` drives them with ``pdserve bench`` or an
in-process client, ``probe`` times relayed tokens, ``profiles`` records py-spy
profiles, ``front`` and ``router`` are the two ``serving_cost`` measurements and
``report`` turns their figures into tables and JSON.
"""
