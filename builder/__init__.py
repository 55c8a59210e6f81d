"""maculaos-sdk: turn a YAML profile into bootable MaculaOS images through staged Docker builds."""

__version__ = "0.1.0"
