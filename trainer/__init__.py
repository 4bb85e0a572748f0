"""Builds, fine-tunes, validates, exports and publishes the personalized BERT ranker."""
