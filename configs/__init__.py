"""Configs: one file per paper setting (`get_config(arg)` returns a ConfigDict)."""
