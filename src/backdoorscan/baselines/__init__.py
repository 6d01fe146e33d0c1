"""Baselines run beside the papers' methods: Neural Cleanse (model scan) and STRIP (input screening)."""
