"""The codec's format names, apart from the codec itself so that settings can name them without loading it."""
from typing import Literal

# What the edge may send at the split (the codec turns each into an EncodedTensor); one definition for all.
CodecName = Literal["int8", "float16", "float32", "bottleneck"]
