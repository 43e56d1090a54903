from healthlab.ledger import Ledger


def test_ledger_fixture_rolls_back(ledger: Ledger, dataset: int) -> None:
    assert dataset == 1
    assert int(ledger.contract.functions.datasetCount().call()) == 1


def test_ledger_fixture_starts_clean(ledger: Ledger) -> None:
    assert int(ledger.contract.functions.datasetCount().call()) == 0
