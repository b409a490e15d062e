"""Which answer clusters a CoVo reward passes, and which trajectories vouch for them.

Pure functions over plain values. Two blind spots of the released rule have knobs here:
- a one-line answer has one state, hence Con 1 and Vol 0, the best a trajectory can score:
  `min_states` keeps such short trajectories out of their cluster's aggregate;
- the threshold can pass several clusters of one prompt (wrong singletons among them):
  `select="top1"` passes only the cluster with the highest value, as majority vote passes one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

# (cons, vols) of the counted members -> the cluster's value
Aggregate = Callable[[Sequence[float], Sequence[float]], float]


def cluster_values(
    members: list[list[int]],
    cons: list[float],
    vols: list[float],
    num_states: list[float],
    min_states: int,
    aggregate: Aggregate,
) -> list[float | None]:
    """Each cluster's value over its members with at least `min_states` states; None for a
    cluster whose members are all shorter (it has no value and cannot pass).

    `members[c]` lists the response indices of cluster c; the other lists are per response.

    >>> mean_con = lambda c, v: sum(c) / len(c)
    >>> cluster_values([[0, 1], [2]], [1.0, 0.5, 1.0], [0.0] * 3, [1, 4, 1], 2, mean_con)
    [0.5, None]
    """
    values: list[float | None] = []
    for cluster in members:
        counted = [i for i in cluster if num_states[i] >= min_states]
        values.append(
            aggregate([cons[i] for i in counted], [vols[i] for i in counted]) if counted else None
        )
    return values


def pass_threshold(values: list[float | None], sizes: list[int], threshold: float) -> list[bool]:
    """The released rule: every cluster whose value is at least `threshold` passes.

    >>> pass_threshold([0.7, 0.4, None, 0.5], [1, 2, 1, 1], 0.5)
    [True, False, False, True]
    """
    return [value is not None and value >= threshold for value in values]


def pass_top1(values: list[float | None], sizes: list[int], threshold: float) -> list[bool]:
    """Only the cluster with the highest value passes (`threshold` is not used); ties go to
    the larger cluster (`sizes`: members, short ones included), then to the earliest cluster
    in sample order. No cluster passes when none has a value.

    >>> pass_top1([0.7, 0.9, 0.9, None], [3, 1, 2, 5], 0.5)
    [False, False, True, False]
    >>> pass_top1([0.9, 0.9], [2, 2], 0.5), pass_top1([None, None], [1, 1], 0.5)
    ([True, False], [False, False])
    """
    valued = [c for c, value in enumerate(values) if value is not None]
    verdicts = [False] * len(values)
    if valued:
        # max() keeps the first of equal keys: the earliest cluster wins a full tie
        verdicts[max(valued, key=lambda c: (values[c], sizes[c]))] = True
    return verdicts


SELECTIONS: dict[str, Callable[[list[float | None], list[int], float], list[bool]]] = {
    "threshold": pass_threshold,
    "top1": pass_top1,
}
