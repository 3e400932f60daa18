// Throws while the module loads: an init error of the thrown type.
'use strict';

class ConformanceError extends Error {
  constructor(message) {
    super(message);
    this.name = 'ConformanceError';
  }
}

throw new ConformanceError('init failed');
