"""How llama.cpp is built and checked (innsteer_local/runtime/llama_build.py), on given CPU flags
and system-info strings: AMX never compiled in on Linux x86-64, the CPU's extensions kept."""

from __future__ import annotations

from innsteer_local.runtime import llama_build as lb

SAPPHIRE = "flags\t\t: fpu sse4_2 avx avx2 fma f16c bmi2 avx512f avx512_vnni avx512vbmi avx512_bf16 amx_tile amx_int8 amx_bf16\n"
AMX_INFO = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | AVX512 = 1 | "
            "AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | AMX_INT8 = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 |")
SAFE_INFO = AMX_INFO.replace("AMX_INT8 = 1 | ", "")


def test_cpu_flags_are_read_from_cpuinfo():
    flags = lb.cpu_flags("processor\t: 0\n" + SAPPHIRE)
    assert {"avx2", "amx_tile", "avx512f"} <= flags


def test_safe_args_keep_extensions_and_drop_amx():
    args = lb.safe_cmake_args(lb.cpu_flags(SAPPHIRE), linux_x86_64=True)
    assert "-DGGML_NATIVE=OFF" in args
    for on in ("GGML_AVX2", "GGML_AVX512", "GGML_AVX512_VNNI", "GGML_AVX512_BF16", "GGML_FMA", "GGML_F16C"):
        assert f"-D{on}=ON" in args
    assert {"-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"} <= set(args)
    assert not any(a.startswith("-DGGML_AMX") and a.endswith("=ON") for a in args)


def test_extensions_the_cpu_lacks_stay_off():
    args = lb.safe_cmake_args({"avx", "avx2", "fma", "f16c"}, linux_x86_64=True)
    assert "-DGGML_AVX512=OFF" in args and "-DGGML_BMI2=OFF" in args and "-DGGML_AVX2=ON" in args


def test_other_platforms_keep_llama_cpp_python_defaults():
    assert lb.safe_cmake_args({"neon"}, linux_x86_64=False) == []
    assert not lb.is_linux_x86_64("Darwin", "arm64") and not lb.is_linux_x86_64("Linux", "aarch64")
    assert lb.is_linux_x86_64("Linux", "x86_64")


def test_user_args_come_after_ours_unless_forced_safe():
    flags = lb.cpu_flags(SAPPHIRE)
    args = lb.build_args("-DGGML_CUDA=on -DGGML_NATIVE=ON", flags, True)
    assert args[-2:] == ["-DGGML_CUDA=on", "-DGGML_NATIVE=ON"]  # a deliberate choice wins in CMake
    forced = lb.build_args("-DGGML_CUDA=on -DGGML_NATIVE=ON", flags, True, force_safe=True)
    assert forced[:2] == ["-DGGML_CUDA=on", "-DGGML_NATIVE=ON"] and "-DGGML_NATIVE=OFF" in forced[2:]


def test_system_info_is_parsed():
    info = lb.parse_system_info(AMX_INFO)
    assert info["AMX_INT8"] == "1" and info["AVX512_VNNI"] == "1"
    assert lb.amx_compiled(AMX_INFO) and not lb.amx_compiled(SAFE_INFO)


def test_amx_build_is_an_error_with_the_fix():
    problems = lb.diagnose(AMX_INFO, lb.cpu_flags(SAPPHIRE), linux_x86_64=True)
    assert [p.severity for p in problems] == ["error"]
    assert "SIGILL" in problems[0].message and "quickstart.sh" in problems[0].fix
    assert lb.diagnose(AMX_INFO, lb.cpu_flags(SAPPHIRE), linux_x86_64=True, allow_amx=True) == []
    assert lb.diagnose(SAFE_INFO, lb.cpu_flags(SAPPHIRE), linux_x86_64=True) == []


def test_missing_extensions_are_a_warning():
    plain = "CPU : SSE3 = 1 | AVX = 1 | OPENMP = 1 |"
    problems = lb.diagnose(plain, lb.cpu_flags(SAPPHIRE), linux_x86_64=True)
    assert [p.severity for p in problems] == ["warning"] and "AVX2" in problems[0].message


def test_wheelhouse_depends_on_the_flags(tmp_path, monkeypatch):
    monkeypatch.setenv("INNSTEER_CACHE", str(tmp_path))
    a, b = lb.wheelhouse(["-DGGML_NATIVE=OFF"]), lb.wheelhouse(["-DGGML_NATIVE=ON"])
    assert a != b and a.parent == b.parent == tmp_path / "wheels"
