def cpu_has_bf16():
    """True when the CPU computes in bf16 natively (x86 avx512_bf16 / amx_bf16, ARM bf16)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
