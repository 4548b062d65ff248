"""Olmax: memory-lean language models in JAX and their T5X-style trainer."""
from olmax import tf_quiet as _tf_quiet

_tf_quiet.install()  # TensorFlow (tf.data only) starts without its CUDA chatter
