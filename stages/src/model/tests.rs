//! Parity and gradient tests of the model on the committed tiny checkpoint.
