"""The search service (``ets serve``): the runner every transport shares, and the transports.

``runner`` owns one search from a transport-neutral ``SearchCall`` to a ``ServedSearch``: the
request checked once (``request``: a ``ValidConfig`` from there on, within the operator's
``Limits``), admission (``admission``), deadline, the pure search loop, answer grouping
(``grouping``), metrics (``metrics``) and the one failure-to-status mapping (``status``); it
offers ``search`` (await the result) and ``stream`` (progress events, then the result; leaving
early cancels). The transports only translate: gRPC (``server``, ``convert`` for the messages)
and the OpenAI-compatible HTTP door (``openai_http``, ``openai_request``: pydantic models of the
body). ``upstreams`` holds the live policy and reward connections and times and classifies each
call; ``readiness`` probes them; ``settings`` declares every setting once (and the search
defaults ``ETS_SEARCH_<FIELD>``); ``main`` is the command line. The gRPC client and the
evaluation are not the service: ``ets.client``, ``ets.evaluation``.

Holds the service only: the in-process test harness is test support and is not imported from here.
"""
