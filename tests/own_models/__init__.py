"""Models of a user's own (not jaxprune's), for the end-to-end tests of `config.model` as an
import path: a Linen residual CNN and an NNX CNN, both with BatchNorm."""
