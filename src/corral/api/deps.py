"""Request-scoped access to the kernel the lifespan created (no globals)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from corral.kernel import Kernel


def get_kernel(request: Request) -> Kernel:
    kernel: Kernel = request.app.state.kernel
    return kernel


KernelDep = Annotated[Kernel, Depends(get_kernel)]
