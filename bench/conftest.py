import _common


def pytest_report_header(config):
    return _common.describe().splitlines()


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["patchcore_fast"] = _common.machine_info()
