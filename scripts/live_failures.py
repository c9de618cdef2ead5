"""pytest plugin for time-boxed runs: each failure's details are printed the
moment the test fails, not in the summary at the end, so a run that its time box
kills still shows why what failed failed (scripts/gpu_run.sh loads it with
``-p scripts.live_failures``)."""


def pytest_runtest_logreport(report):
    if not report.failed:
        return
    text = report.longreprtext
    if len(text) > 4000:  # a long traceback: its end says where and why
        text = "...\n" + text[-4000:]
    print(
        f"\n=== FAILED {report.nodeid} ({report.when})\n{text}\n=== end of {report.nodeid}",
        flush=True,
    )
