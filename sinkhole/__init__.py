"""sinkhole: a DNS sinkhole resolver that blocks generative-AI services and audits every attempt."""

__version__ = "0.1.0"
