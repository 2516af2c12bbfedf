"""The training and authoring commands: record, synth, prepare, fit, evaluate, render, make_demo, figure.
May import :mod:`avatar`; never another app."""
