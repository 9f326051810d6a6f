"""Plumbing shared by the scripts at the top: settings and torchrun, data, views, features, resuming."""
