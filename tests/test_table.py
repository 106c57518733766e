"""The agent's tables count each cluster's rows as they change (status asks for the counts on
every call, so they are kept, not counted): the counts always equal a walk of the rows."""

import attrs
from hypothesis import given
from hypothesis import strategies as st

from meshagent.model.table import Table


@attrs.frozen
class Row:
    cluster: str
    value: int


CLUSTERS = ("cluster1", "cluster2", "cluster3")
changes = st.lists(st.tuples(st.booleans(), st.integers(0, 5), st.sampled_from(CLUSTERS),
                             st.integers(0, 2), st.sampled_from((None, *CLUSTERS))), max_size=60)


@given(changes)
def test_counts_follow_every_upsert_and_delete(steps):
    heard = []
    table = Table("node", lambda kind, row: heard.append(kind))
    for upsert, key, cluster, value, owner in steps:
        if upsert:
            table.upsert(key, Row(cluster, value))
        else:
            table.delete(key, owner)
        for name in CLUSTERS:
            walked = sum(1 for k in table if table.get(k).cluster == name)
            assert table.count(name) == walked


def test_a_row_moving_to_another_cluster_moves_its_count():
    table = Table("node", lambda kind, row: None)
    table.upsert("a", Row("cluster2", 1))
    table.upsert("a", Row("cluster3", 1))
    assert (table.count("cluster2"), table.count("cluster3")) == (0, 1)
    assert table.delete("a", "cluster2") is None and table.count("cluster3") == 1
    table.delete("a")
    assert table.count("cluster3") == 0
