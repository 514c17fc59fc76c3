"""The product's receiver: pulls data from crate IOCs over the gtReceiver protocol (spec 05)."""
