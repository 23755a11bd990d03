"""Helpers for tests and demos (as accelerate keeps `test_utils`): nothing the runtime imports."""
