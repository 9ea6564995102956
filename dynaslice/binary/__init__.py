"""Binary neural networks (1-bit weights and activations): ReCU, SiMaN and the plain baseline.

``layers`` holds the binary convolution (one base class, one subclass per method); the
deployable form of a trained layer is :class:`~dynaslice.binary.layers.BinaryConvSpec`, which
the bit-packed export and the 1-bit CPU kernel read.
"""
