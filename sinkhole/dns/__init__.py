"""The query path, bytes in and bytes out: codec (the one home of wire parsing), guard, answer, cache, upstream,
pipeline (the stage order), listener."""
