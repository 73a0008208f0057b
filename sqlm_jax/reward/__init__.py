"""From answers to rewards: the vote or the tests, the proposer's band, the guards."""
