"""What a feature is and where it lives.

One small module per feature family, each with its typed state, its pure update rule (state +
event -> state, event time only) and its encoding: :mod:`features.user`, :mod:`features.item`,
:mod:`features.query_item`, :mod:`features.catalog`. :mod:`features.plan` turns a batch of events
into the writes they cause; a store (:mod:`features.memory` for offline training,
:mod:`features.redis_store` online) commits them; :mod:`features.read` is the one read path the
scorer and the trainer share. The Redis layout is on one screen in :mod:`features.keys`.
"""
