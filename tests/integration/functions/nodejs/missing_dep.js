// Requires a package that is not installed: Runtime.ImportModuleError.
'use strict';

require('no-such-package-lambdalet');
exports.handler = async () => 'unreachable';
