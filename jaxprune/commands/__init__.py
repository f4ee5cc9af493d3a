"""The bodies of the ``jaxprune`` commands other than training (`jaxprune.cli` holds the flags;
`jaxprune.experiment` the training run): one module per command."""
