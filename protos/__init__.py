"""Generated protocol modules (see generate.py). TensorFlow Serving's come from the official
``tensorflow-serving-api`` package instead of copies, so the wire types are the real ones."""
