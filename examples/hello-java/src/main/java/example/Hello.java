package example;

import com.amazonaws.services.lambda.runtime.Context;
import com.amazonaws.services.lambda.runtime.RequestHandler;
import java.util.Map;

/** Returns a greeting for event["name"]. */
public class Hello implements RequestHandler<Map<String, Object>, Map<String, String>> {
    @Override
    public Map<String, String> handleRequest(Map<String, Object> event, Context context) {
        Object given = event == null ? null : event.get("name");
        String name = given == null ? "world" : given.toString();
        System.out.println("greeting " + name);
        return Map.of("message", "Hello, " + name + "!");
    }
}
