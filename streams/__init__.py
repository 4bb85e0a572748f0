"""Feature workers that keep shopper, product and query features in Redis as events arrive.

:mod:`streams.worker` runs one worker with the engine the settings name: :mod:`streams.batch`
(librdkafka batches, the default) or :mod:`streams.app` (faust agents). Both hand raw records to
:mod:`streams.processor`, which turns a batch into one atomic feature-store commit;
:mod:`streams.deadletter` is the one place bad input goes; :mod:`streams.rebuild` recomputes
everything from the retained log; :mod:`streams.forget` forgets a shopper durably;
:mod:`streams.commands` adds ``shoprank streams``, ``rebuild`` and ``forget``.
"""
