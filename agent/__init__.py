"""glucoagent device agent."""
