"""GL import cost: an exported fd → a usable GL texture, against the raw GL calls it is made of, in the same run.

The raw peer is the minimum any GL consumer pays (glCreateMemoryObjectsEXT, glImportMemoryFdEXT, glGenTextures,
glTexStorageMem2DEXT); the difference is texbridge's overhead (UUID check, tiling, swizzle, verification, state
save/restore, the Python object). Export (vkGetMemoryFdKHR) and deletion happen outside the timed region for both.
Run as a script to print the table.
"""

from __future__ import annotations

import sys
import time

from ._report import Row, latency_row, print_rows


def run(quick: bool) -> list[Row]:
    from texbridge.backends import get_backend

    gl = get_backend("gl")
    vk = get_backend("vulkan")
    from OpenGL import GL

    from texbridge.backends import gl as glmod

    ctx = glmod.headless_context()
    n = 200 if quick else 2000
    rows: list[Row] = []
    for w, h in ((256, 256), (1920, 1080)):
        with vk.create_texture(w, h, "rgba8", memory="opaque_fd") as src:
            desc = src.descriptor
            alloc = desc.driver_private["allocation_size"]
            tiling = glmod._tiling(desc)
            texbridge_s, raw_s = [], []
            for _ in range(10):  # warm-up (lazy PyOpenGL entry points, driver caches)
                gl.import_resource(desc, src.export_fds()).close()
            for _ in range(n):
                fd = src.export_fds()[0]
                t0 = time.perf_counter()
                res = gl.import_resource(desc, [fd])
                texbridge_s.append(time.perf_counter() - t0)
                res.close()

                fd = src.export_fds()[0]
                mem = glmod._GLuint1()
                t0 = time.perf_counter()
                glmod._mo.glCreateMemoryObjectsEXT(1, mem)
                glmod._mofd.glImportMemoryFdEXT(mem[0], alloc, glmod.GL_HANDLE_TYPE_OPAQUE_FD_EXT, fd)
                tex = int(GL.glGenTextures(1))
                GL.glBindTexture(GL.GL_TEXTURE_2D, tex)
                GL.glTexParameteri(GL.GL_TEXTURE_2D, glmod.GL_TEXTURE_TILING_EXT, tiling)
                glmod._mo.glTexStorageMem2DEXT(GL.GL_TEXTURE_2D, 1, 0x8058, w, h, mem[0], 0)
                raw_s.append(time.perf_counter() - t0)
                GL.glBindTexture(GL.GL_TEXTURE_2D, 0)
                GL.glDeleteTextures(1, glmod._GLuint1(tex))
                glmod._mo.glDeleteMemoryObjectsEXT(1, mem)
            group = f"fd → GL texture {w}x{h} ({ctx.caps.renderer.split(' (')[0]})"
            rows.append(latency_row(group, "texbridge gl.import_resource", texbridge_s, f"n={n}"))
            rows.append(latency_row(group, "raw glImportMemoryFdEXT+glTexStorageMem2DEXT", raw_s, f"n={n}"))
    # a round trip the way an application sees it: render in GL, finish, read in NumPy
    with gl.create_texture(256, 256, "rgba8") as res:
        fbo = res.framebuffer()
        samples = []
        for i in range(50 if quick else 500):
            t0 = time.perf_counter()
            GL.glBindFramebuffer(GL.GL_FRAMEBUFFER, fbo)
            GL.glClearColor((i % 255) / 255, 0, 0, 1)
            GL.glClear(GL.GL_COLOR_BUFFER_BIT)
            GL.glBindFramebuffer(GL.GL_FRAMEBUFFER, 0)
            res.end_access()
            samples.append(time.perf_counter() - t0)
        rows.append(latency_row("GL frame release (clear 256x256 + sync)", f"texbridge end_access ({res.gl_sync})",
                                samples))
    return rows


if __name__ == "__main__":
    print_rows(run("--quick" in sys.argv))
