"""Quantization jobs: REST submits, Redis (SAQ) queues, `qarvd worker` processes run them."""
