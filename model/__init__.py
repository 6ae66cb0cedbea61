"""ADTR: frozen CNN features reconstructed by a transformer; the error is the anomaly map.

Plain PyTorch: nothing in this package imports Ray or ZeroMQ.
"""
