"""Parity suite: jgpt against the PyTorch reference (ref/train_gpt.py), same weights, same inputs.

A package so that test modules can import the shared harness as `parity.conftest`.
"""
