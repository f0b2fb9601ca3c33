"""Integrations of the accumulator into training frameworks (optional extras: ``proma[trl]``)."""
