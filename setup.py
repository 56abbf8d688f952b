"""Build hook: compiles the K-quant group searches (quant/_kqnative.c) and the GGML-block CPU
kernels (kernels/_ggmlcpu.c). Metadata is in pyproject.toml.

Both extensions are optional: without a C compiler the package still installs; the encoders then
use their numpy reference (same bytes, ~10x slower) and the torch engine compiles the kernels on
first use if a compiler appears, else keeps its slower packed-int4 path (and says so once).
The K-quant flags keep C's float32 semantics (no FMA contraction, no fast-math), which the
byte-identical output depends on; the kernels are compiled per ISA with target attributes and
choose one at load time, so neither uses -march.
"""
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

FLAGS = {
    "edgeinfer.quant._kqnative": ["-O3", "-std=c11", "-ffp-contract=off", "-fno-fast-math", "-fvisibility=hidden"],
    "edgeinfer.kernels._ggmlcpu": ["-O3", "-std=gnu11", "-pthread", "-fvisibility=hidden"],
}


class BuildExt(build_ext):
    def build_extensions(self):
        for ext in self.extensions:
            if self.compiler.compiler_type == "msvc":
                ext.extra_compile_args = ["/O2", "/fp:precise"]
            else:
                ext.extra_compile_args = FLAGS[ext.name]
                if ext.name.endswith("_ggmlcpu"):
                    ext.extra_link_args = ["-pthread"]
        super().build_extensions()


setup(
    ext_modules=[
        Extension("edgeinfer.quant._kqnative", ["quant/_kqnative.c"], optional=True),
        Extension("edgeinfer.kernels._ggmlcpu", ["kernels/_ggmlcpu.c"], depends=["kernels/_ggmlcpu_step.h", "kernels/_ggmlcpu_simd.h"],
                  optional=True),
    ],
    cmdclass={"build_ext": BuildExt},
)
