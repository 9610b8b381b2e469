"""Neural-network building blocks: spatial layers, losses and the template / registration networks."""
