"""Honest offline evaluation: metrics, the Best Buy time split and CrowdFlower folds, baselines, the
harness that scores point-in-time, and the quality report (``bench/results/quality.json``)."""
