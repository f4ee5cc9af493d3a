"""The experiment configs, one file per paper row (``jaxprune train --config sfp_resnet56_cifar10``
names one; `jaxprune.config.packaged_configs` lists them). ``common`` holds the shared recipes
and the ``config.paper`` block; each row file is loaded by path (`jaxprune.config.load_config`)."""
