"""Run one function in several threads at once, for the tests that check per-call state under concurrency."""

import threading

import torch


def run_in_threads(run, names, repeats):
    """Call ``run(name)`` ``repeats`` times in one thread per name, all threads released together.

    Returns {name: [result, ...]} in call order; raises AssertionError listing each thread's error.
    Every call runs under ``torch.no_grad()`` (the threads' own grad mode starts enabled).
    """
    start = threading.Barrier(len(names))
    results = {name: [] for name in names}
    errors = []

    def worker(name):
        try:
            with torch.no_grad():
                start.wait()
                for _ in range(repeats):
                    results[name].append(run(name))
        except BaseException as err:  # noqa: BLE001  (reported below, with the thread's name)
            errors.append((name, err))

    threads = [threading.Thread(target=worker, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for name in names:
        assert len(results[name]) == repeats, (name, len(results[name]))
    return results
