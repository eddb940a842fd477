"""What both services share: settings, the store and its migrations, credential formats, hashing, logging, errors."""
