"""KFP components of the ipa-align round (see components/README.md)."""
