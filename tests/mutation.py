"""Each module's mutation score, from the last `mutmut run` (docs/testing.md): `python -m tests.mutation`.

The score of a module is the share of its mutants that its tests kill (a mutant that makes them hang counts as
killed), leaving out the mutants listed below as equivalent: changes that no input can tell apart, each with why.
Where a module is in scope only in part (the sweep's claiming, train.py's evaluation), only those functions count.
"""

import re
import subprocess
import sys
from collections import Counter

# module: the functions (and classes) in scope, by name as mutmut writes them; None for all of the module.
SCOPE: dict[str, tuple[str, ...] | None] = {
    "fmnist.serve.protocol": None,
    "fmnist.serve.batching": None,
    "fmnist.files": None,
    "fmnist.checkpoint": None,
    "fmnist.ood": None,
    "fmnist.runtime": ("load_image", "_decode", "_fashion_mnist_geometry"),   # the preparation of an image
    "fmnist.loop": ("TrainingState", "MovingAverage", "train_epoch", "make_step"),   # the loop
    "fmnist.train": ("infer", "evaluate"),
    "fmnist.sweep.study": ("claim", "fail", "frozen", "heartbeat_storage", "Heartbeat"),          # the claiming
    "fmnist.sweep.workers": ("worker_id", "_is_dead", "requeue", "release_stale", "next_trial", "suggest"),
}

# Mutants that change nothing a caller can see: why, and mutmut's names for them. mutmut numbers a function's
# mutants in order, so a change to a function renumbers them: after one, check its names with `mutmut show`.
WHY_EQUIVALENT: dict[str, tuple[str, ...]] = {
    'a length of -2 is as unknown as -1: only a non-negative length is compared': (
        'fmnist.serve.protocol.x_parse_request__mutmut_17',),
    "include_url adds a 'url' key to pydantic's error dict, which the message never reads": (
        'fmnist.serve.protocol.x__first_problem__mutmut_3',),
    "zip's strictness: the lengths of the two shapes are compared just before": (
        'fmnist.serve.protocol.x_input_tensor__mutmut_18', 'fmnist.serve.protocol.x_input_tensor__mutmut_21',
        'fmnist.serve.protocol.x_input_tensor__mutmut_22',),
    "astype's copy: the array is a new one either way, and nothing else holds it": (
        'fmnist.serve.protocol.x_input_tensor__mutmut_49', 'fmnist.serve.protocol.x_input_tensor__mutmut_51',
        'fmnist.serve.protocol.x_input_tensor__mutmut_53',),
    "get()'s default None or omitted: bool(None) is False, the default it replaces": (
        'fmnist.serve.protocol.x_wanted_outputs__mutmut_4', 'fmnist.serve.protocol.x_wanted_outputs__mutmut_6',),
    "argsort of 10 values along their one axis: numpy sorts 16 or fewer stably whatever kind says, 'STABLE' "
    "is read as 'stable', and axis -1 is axis 1 here": (
        'fmnist.serve.protocol.x_classification__mutmut_15', 'fmnist.serve.protocol.x_classification__mutmut_17',
        'fmnist.serve.protocol.x_classification__mutmut_18', 'fmnist.serve.protocol.x_classification__mutmut_22',),
    'dtype=object omitted: the strings become np.str_, which is str to every caller and to the encoders': (
        'fmnist.serve.protocol.x_classification__mutmut_24', 'fmnist.serve.protocol.x_classification__mutmut_26',),
    "zip's strictness: values and order have the same rows by construction": (
        'fmnist.serve.protocol.x_classification__mutmut_29', 'fmnist.serve.protocol.x_classification__mutmut_32',
        'fmnist.serve.protocol.x_classification__mutmut_33',),
    'reshape(-2): numpy takes any negative size as the unknown one': (
        'fmnist.serve.protocol.x_encode_response__mutmut_21', 'fmnist.serve.protocol.x__bytes_elements__mutmut_4',
        'fmnist.ood.x_fit__mutmut_11',),
    "'<i' and '<I' pack the same 4 bytes for any length under 2**31": (
        'fmnist.serve.protocol.x__bytes_elements__mutmut_14',),
    "entering the wait with max_delay 0 or a full batch waits for nothing: the deadline is now, or the loop's "
    "own queued < max_batch fails at once": (
        'fmnist.serve.batching.xǁBatcherǁ_serve__mutmut_3', 'fmnist.serve.batching.xǁBatcherǁ_serve__mutmut_4',
        'fmnist.serve.batching.xǁBatcherǁ_serve__mutmut_6',),
    '> 0 or >= 0 differ only when the time left is exactly 0.0, and waiting 0 s is not waiting': (
        'fmnist.serve.batching.xǁBatcherǁ_serve__mutmut_13',),
    "always concatenating: one request's images are copied, the same values": (
        'fmnist.serve.batching.xǁBatcherǁ_run__mutmut_3',),
    'holder files are one short JSON line, far under 4,096 bytes': (
        'fmnist.files.x__read_holder__mutmut_8',),
    "an empty holder file: b'XX{}XX' fails to parse and {} lacks 'since', both 'a process that is starting'": (
        'fmnist.files.x__read_holder__mutmut_9',),
    'astype(None) is astype(float64)': (
        'fmnist.ood.x_fit__mutmut_5',),
    "np.cov's bias=None: numpy tests bias == 0, which None is not, so the divisor is N as with bias=True": (
        'fmnist.ood.x_fit__mutmut_49', 'fmnist.ood.x_fit__mutmut_63',),
    "the pixel covariance over N - 1 rather than N: one factor for the whole matrix (its ridge too), which "
    "scales every pixel distance alike, and the part's scale (its median, its 95th percentile) takes it out": (
        'fmnist.ood.x_fit__mutmut_51', 'fmnist.ood.x_fit__mutmut_52',),
    "zip's strictness: the class means and the whitenings are both one a class": (
        'fmnist.ood.x_fit__mutmut_134', 'fmnist.ood.x_fit__mutmut_137', 'fmnist.ood.x_fit__mutmut_138',),
    "zip's strictness over the batches' (pixels, conv, blank) parts, three lists of the same batches": (
        'fmnist.ood.x_fit__mutmut_156', 'fmnist.ood.x_fit__mutmut_158', 'fmnist.ood.x_fit__mutmut_169',),
    "the pixel part's placeholder scale (1) and offset (0), before they are measured: the rescaling to its "
    "median and 95th percentile takes out any factor and any shift": (
        'fmnist.ood.x_fit__mutmut_86', 'fmnist.ood.x_fit__mutmut_128',),
    "max_pool2d's stride None or omitted is its kernel size, 2": (
        'fmnist.ood.xǁDetectorǁcomputed__mutmut_8', 'fmnist.ood.xǁDetectorǁcomputed__mutmut_11',),
    'astype(None) is astype(float64): rounded levels 0..255 give the same float32 input': (
        'fmnist.runtime.x_load_image__mutmut_48',),
    'compositing an opaque L or RGB image on the background changes no pixel': (
        'fmnist.runtime.x__decode__mutmut_39',),
    "a background of (1, 0, 0) or (0, 0, 1) is grey level 0 in PIL's L conversion": (
        'fmnist.runtime.x__decode__mutmut_61', 'fmnist.runtime.x__decode__mutmut_63',),
    'PIL clamps a colour component of 256 to 255': (
        'fmnist.runtime.x__decode__mutmut_64', 'fmnist.runtime.x__decode__mutmut_67',
        'fmnist.runtime.x__decode__mutmut_68', 'fmnist.runtime.x__decode__mutmut_69',
        'fmnist.runtime.x__decode__mutmut_70',),
    'I and F without dtype: int32 is promoted to float64 against the float minimum, and float32 holds the '
    'levels 0..255 exactly after the scaling': (
        'fmnist.runtime.x__decode__mutmut_95', 'fmnist.runtime.x__decode__mutmut_97',),
    'grey levels as uint8 instead of float64: every later use subtracts a float or stays within 0..255': (
        'fmnist.runtime.x__decode__mutmut_113', 'fmnist.runtime.x__decode__mutmut_115',),
    "> or >= 12.75: integer levels never differ from the corner's median by exactly 12.75": (
        'fmnist.runtime.x__fashion_mnist_geometry__mutmut_20',),
    "PIL's unsharp mask gives the same pixels at 100 and 101 percent (its fixed-point arithmetic; checked on "
    "random edges)": (
        'fmnist.runtime.x__fashion_mnist_geometry__mutmut_70',),
    'the canvas as uint8 instead of float64: the levels 0..255 are negated and rounded the same': (
        'fmnist.runtime.x__fashion_mnist_geometry__mutmut_100',
        'fmnist.runtime.x__fashion_mnist_geometry__mutmut_102',),
    'on this CPU-only machine None is the CPU, where the images are (tests/test_cuda.py runs it on a GPU)': (
        'fmnist.loop.xǁTrainingStateǁ__init____mutmut_2', 'fmnist.loop.xǁTrainingStateǁ__init____mutmut_4',
        'fmnist.loop.xǁTrainingStateǁ__init____mutmut_44', 'fmnist.loop.xǁTrainingStateǁ__init____mutmut_46',
        'fmnist.loop.x_train_epoch__mutmut_4', 'fmnist.loop.x_train_epoch__mutmut_7',
        'fmnist.loop.x_train_epoch__mutmut_11', 'fmnist.loop.x_train_epoch__mutmut_13',
        'fmnist.loop.x_train_epoch__mutmut_16', 'fmnist.loop.x_train_epoch__mutmut_19',),
    'channels_last is a memory layout for speed; the values are the same': (
        'fmnist.loop.xǁTrainingStateǁ__init____mutmut_3', 'fmnist.loop.xǁTrainingStateǁ__init____mutmut_5',),
    'typing.cast does nothing at run time': (
        'fmnist.loop.xǁTrainingStateǁnetwork__mutmut_3',),
    'the buffer loop: the Network has no buffers, so it never runs (kept for a model that has them)': (
        'fmnist.loop.xǁMovingAverageǁupdate_parameters__mutmut_21',
        'fmnist.loop.xǁMovingAverageǁupdate_parameters__mutmut_22',
        'fmnist.loop.xǁMovingAverageǁupdate_parameters__mutmut_23',
        'fmnist.loop.xǁMovingAverageǁupdate_parameters__mutmut_24',
        'fmnist.loop.xǁMovingAverageǁupdate_parameters__mutmut_25',
        'fmnist.loop.xǁMovingAverageǁupdate_parameters__mutmut_26',),
    'assign None or omitted is False, what every caller passes': (
        'fmnist.loop.xǁMovingAverageǁload_state_dict__mutmut_6',
        'fmnist.loop.xǁMovingAverageǁload_state_dict__mutmut_9',),
    'the correct count as float32: counts up to 60,000 are exact below 2**24': (
        'fmnist.loop.x_train_epoch__mutmut_17', 'fmnist.loop.x_train_epoch__mutmut_20',),
    'zeroed gradients instead of None: the next backward writes the same values': (
        'fmnist.loop.x_make_step__mutmut_21', 'fmnist.loop.x_make_step__mutmut_22',),
    "a batch of 2,001 instead of 2,000: each image's logits do not depend on its batch": (
        'fmnist.train.x_infer__mutmut_1',),
    "partition or rpartition of 'host:pid': host names hold no colon": (
        'fmnist.sweep.workers.x__is_dead__mutmut_5',),
    'deepcopy of the trials read: the code only reads them': (
        'fmnist.sweep.workers.x_release_stale__mutmut_4', 'fmnist.sweep.workers.x_release_stale__mutmut_6',
        'fmnist.sweep.workers.x_release_stale__mutmut_9', 'fmnist.sweep.workers.x_next_trial__mutmut_1',
        'fmnist.sweep.workers.x_next_trial__mutmut_3', 'fmnist.sweep.workers.x_next_trial__mutmut_6',
        'fmnist.sweep.workers.x_next_trial__mutmut_15', 'fmnist.sweep.workers.x_next_trial__mutmut_17',
        'fmnist.sweep.workers.x_next_trial__mutmut_20',),
    'every trial instead of the WAITING ones: claim() wins only a WAITING one (the storage refuses RUNNING to '
    'RUNNING, and finished trials)': (
        'fmnist.sweep.workers.x_next_trial__mutmut_2', 'fmnist.sweep.workers.x_next_trial__mutmut_4',),
}
EQUIVALENT = {name: why for why, names in WHY_EQUIVALENT.items() for name in names}

KILLED = ("killed", "timeout")


def function_of(name: str) -> tuple[str, str]:
    """('fmnist.ood', 'fit') from 'fmnist.ood.x_fit__mutmut_3'; a method counts as its class:
    ('fmnist.serve.batching', 'Batcher') from 'fmnist.serve.batching.xǁBatcherǁ_run__mutmut_1'."""
    module, _, mangled = name.rpartition(".")
    function = mangled.split("__mutmut_")[0]
    return module, function.split("ǁ")[1] if function.startswith("xǁ") else function.removeprefix("x_")


def in_scope(module: str, function: str) -> bool:
    wanted = SCOPE.get(module, ())
    return wanted is None or function in (wanted or ())


def main() -> None:
    listing = subprocess.run(["mutmut", "results", "--all", "true"], capture_output=True, text=True, check=True)
    rows: dict[str, Counter] = {module: Counter() for module in SCOPE}
    survivors = []
    for line in listing.stdout.splitlines():
        match = re.fullmatch(r"\s*(\S+): (.+)", line)
        if not match:
            continue
        name, status = match.groups()
        module, function = function_of(name)
        if module not in rows or not in_scope(module, function):
            continue
        status = "equivalent" if name in EQUIVALENT else status
        rows[module][status] += 1
        if status not in KILLED + ("equivalent",):
            survivors.append(f"{name}: {status}")
    print("| module | mutants | killed | equivalent | survived | score | killed of all |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for module, counts in rows.items():
        total, killed = sum(counts.values()), sum(counts[s] for s in KILLED)
        counted = total - counts["equivalent"]
        score = f"{killed / counted:.0%}" if counted else "-"
        print(f"| {module} | {total} | {killed} | {counts['equivalent']} | {counted - killed} | {score} | "
              f"{killed / total:.0%} |" if total else "-")
    if survivors:
        print("\nsurvivors:", *survivors, sep="\n  ", file=sys.stderr)


if __name__ == "__main__":
    main()
