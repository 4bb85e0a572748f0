"""faust-streaming workers that keep shopper, product and query features in Redis as events arrive.

:mod:`streams.app` builds the faust app from the settings; :mod:`streams.processor` turns a batch
of raw Kafka records into one atomic feature-store commit; :mod:`streams.deadletter` is the one
place bad input goes; :mod:`streams.rebuild` recomputes everything from the retained log;
:mod:`streams.commands` adds ``shoprank streams``, ``rebuild`` and ``forget``.
"""
