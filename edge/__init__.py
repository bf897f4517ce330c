"""The tracking edge (contract §8): tracking links, the browser snippet and signed postbacks,
over HTTP into Kafka, losing nothing (`attribution edge`)."""
