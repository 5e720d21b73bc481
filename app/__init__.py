"""The ``quantmill`` program: the library's, the pipeline's and the stack's commands."""
