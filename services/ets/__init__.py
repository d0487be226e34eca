"""ETS: PRM-guided efficient tree search served over gRPC.

One package, a folder per room (the code map: docs/search-core.md#code-map). ``search`` is the
pure algorithm; ``policy`` and ``reward`` reach the model servers; ``engine`` launches and
supervises server processes; ``service`` serves searches (gRPC and OpenAI HTTP); ``client`` and
``evaluation`` are tools that call the service; ``testing`` is test and demo support, left out of
the search image. At the top: ``config`` (the search's settings and their paper defaults),
``settings`` (the one loader of env vars and flags), ``admission`` (the shared admission
primitive), ``security`` (TLS and tokens), ``errors``, ``tasks`` (stopping a background task),
``retry`` (the one backoff schedule), ``models`` (packaged real models), ``healthcheck``, ``cli``
(the ``ets`` command) and ``api`` (generated gRPC stubs).
"""
